"""The gateway's questions to the control plane: who is this, may they, is it registered.

Asynchronous (httpx.AsyncClient) so that one slow answer never holds up the
other connections. Every failure (timeout, refusal, garbage) raises a
TrustplaneError, which the gateway turns into a denial: fail closed.

The gateway has its own identity: a registered node signs a short-lived
assertion (RFC 7523) with its key and gets a token, renewed before it
expires; or an operator hands it a token file. It asks `POST /v1/authorize`
for the caller (`subject`), which only nodes and admins may do.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from jwcrypto import jwk, jwt

from trustplane.errors import (
    AuthError,
    MalformedError,
    TrustplaneError,
    UnavailableError,
    error_from_http,
)

WHOAMI_TTL = 30.0
WHOAMI_CACHE = 4096
REFUSED_TTL = 5.0
ASSERTION_LIFETIME = 60


@dataclass(frozen=True)
class Caller:
    """Who sent a request, as the control plane vouches for them."""

    subject: str
    role: str
    gateways: frozenset[str] | None = None
    """The gateways the caller's token is scoped to; None: not scoped."""
    token_id: str = ""
    issued_at: float = 0.0
    """The token's id and issue time, which revocations name (revocations.py)."""

    @property
    def kind_and_name(self) -> tuple[str, str]:
        kind, _, name = self.subject.partition(":")
        return kind, name


@dataclass(frozen=True)
class NodeCredential:
    """A registered node's name and private key (PEM) for the JWT bearer grant."""

    name: str
    key_file: Path


class ControlLink:
    def __init__(
        self,
        url: str,
        ca_file: Path | None,
        *,
        node: NodeCredential | None = None,
        token_file: Path | None = None,
        timeout: float = 5.0,
    ) -> None:
        if node is None and token_file is None:
            raise AuthError(
                "the gateway needs its own identity: --node and --node-key, or --token-file"
            )
        self.url = url.rstrip("/")
        verify = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        self._http = httpx.AsyncClient(base_url=self.url, verify=verify, timeout=timeout)
        self._node = node
        self._token_file = token_file
        self._token: str | None = None
        self._token_expires = 0.0
        self._token_lock = asyncio.Lock()
        self._whoami: OrderedDict[bytes, tuple[float, Caller]] = OrderedDict()
        self._refused: OrderedDict[bytes, tuple[float, str]] = OrderedDict()
        self.name: str | None = node.name if node is not None else None
        """This gateway's own name (its node's), which scoped tokens must list."""

    async def close(self) -> None:
        await self._http.aclose()

    # -- plumbing -------------------------------------------------------------------

    async def _call(self, method: str, path: str, token: str, **kwargs: Any) -> Any:
        try:
            response = await self._http.request(
                method, path, headers={"Authorization": f"Bearer {token}"}, **kwargs
            )
        except httpx.HTTPError as exc:
            raise UnavailableError(f"control plane {self.url}: {type(exc).__name__}") from None
        if response.status_code >= 400:
            raise _error(response)
        try:
            return response.json()
        except ValueError:
            raise MalformedError("the control plane sent no JSON") from None

    async def ensure_identity(self) -> None:
        """Get the gateway's own token now: a gateway that cannot ask must not start."""
        await self._own_token()

    async def own_name(self) -> str:
        """This gateway's name: its node's, or (a token file) whoever its token names."""
        if self.name is None:
            answer = await self._call("GET", "/v1/auth/whoami", await self._own_token())
            subject = answer.get("subject") if isinstance(answer, dict) else None
            if not isinstance(subject, str) or ":" not in subject:
                raise MalformedError("the control plane's whoami answer is malformed")
            self.name = subject.partition(":")[2]
        return self.name

    async def _own_token(self) -> str:
        async with self._token_lock:
            if self._token is not None and time.time() < self._token_expires:
                return self._token
            if self._node is not None:
                await self._login_node(self._node)
            else:
                assert self._token_file is not None
                try:
                    self._token = self._token_file.read_text().strip()
                except OSError as exc:
                    raise AuthError(f"token file {self._token_file}: {exc.strerror}") from None
                self._token_expires = time.time() + 60  # re-read: it may be rotated
            assert self._token is not None
            return self._token

    async def _login_node(self, node: NodeCredential) -> None:
        try:
            key = jwk.JWK.from_pem(node.key_file.read_bytes())
        except (OSError, ValueError) as exc:
            raise AuthError(f"node key {node.key_file}: {exc}") from None
        issued = int(time.time())
        assertion = jwt.JWT(
            header={"alg": _signing_alg(key)},
            claims={
                "iss": node.name,
                "sub": node.name,
                "aud": self.url + "/v1/auth/token",
                "iat": issued,
                "exp": issued + ASSERTION_LIFETIME,
                "jti": str(uuid.uuid4()),
            },
        )
        assertion.make_signed_token(key)
        try:
            response = await self._http.post(
                "/v1/auth/token",
                json={
                    "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                    "node": node.name,
                    "assertion": assertion.serialize(),
                },
            )
        except httpx.HTTPError as exc:
            raise UnavailableError(f"control plane {self.url}: {type(exc).__name__}") from None
        if response.status_code >= 400:
            raise _error(response)
        answer = response.json()
        self._token = str(answer["access_token"])
        # Renew well before expiry, so no request meets an expired token.
        self._token_expires = time.time() + max(5, int(answer["expires_in"]) * 0.8)

    # -- questions ----------------------------------------------------------------------

    async def whoami(self, token: str, cached_ok: bool = True) -> Caller:
        """The caller behind a token; verified answers are cached for WHOAMI_TTL seconds.

        `cached_ok=False` asks the control plane even for a cached token (the
        gateway's revocation list is stale: only a fresh answer counts).
        """
        key = hashlib.sha256(token.encode()).digest()
        now = time.monotonic()
        cached = self._whoami.get(key)
        if cached_ok and cached is not None and cached[0] > now:
            return cached[1]
        refused = self._refused.get(key)
        if refused is not None and refused[0] > now:
            raise AuthError(refused[1])
        try:
            answer = await self._call("GET", "/v1/auth/whoami", token)
        except AuthError as exc:
            # Remember a refused token briefly: a flood of bad tokens must not
            # become a flood of questions to the control plane.
            self._refused[key] = (now + REFUSED_TTL, str(exc))
            while len(self._refused) > WHOAMI_CACHE:
                self._refused.popitem(last=False)
            raise
        try:
            gateways = answer.get("gateways")
            if gateways is not None and not (
                isinstance(gateways, list) and all(isinstance(g, str) for g in gateways)
            ):
                raise TypeError
            caller = Caller(
                str(answer["subject"]),
                str(answer["role"]),
                frozenset(gateways) if gateways is not None else None,
                str(answer.get("token_id") or ""),
                float(answer.get("issued_at") or 0.0),
            )
        except (KeyError, TypeError, AttributeError, ValueError):
            raise MalformedError("the control plane's whoami answer is malformed") from None
        self._whoami[key] = (now + WHOAMI_TTL, caller)
        while len(self._whoami) > WHOAMI_CACHE:
            self._whoami.popitem(last=False)
        return caller

    async def authorize(
        self,
        caller: Caller,
        action: str,
        resource: str,
        context: dict[str, str | int | float | bool | None] | None = None,
    ) -> tuple[bool, str]:
        """(allowed, reason); only an explicit `allow` is True.

        `context` (the container's metadata) is logged with the decision.
        """
        kind, name = caller.kind_and_name
        request: dict[str, Any] = {
            "subject": {"kind": kind, "name": name},
            "action": action,
            "resource": resource,
        }
        if context:
            request["context"] = context
        answer = await self._call("POST", "/v1/authorize", await self._own_token(), json=request)
        if not isinstance(answer, dict):
            raise MalformedError("the control plane's authorize answer is malformed")
        return answer.get("decision") == "allow", str(answer.get("reason", ""))

    async def images(self, repository: str) -> list[dict[str, Any]]:
        """What the control plane registered for `repository` (possibly nothing)."""
        answer = await self._call(
            "GET", "/v1/images", await self._own_token(), params={"repository": repository}
        )
        if not isinstance(answer, list):
            raise MalformedError("the control plane's image list is malformed")
        return answer

    async def signatures(self, repository: str, digest: str) -> list[dict[str, Any]]:
        """The signatures the control plane logged for `repository@digest` (possibly none)."""
        answer = await self._call(
            "GET",
            "/v1/signatures",
            await self._own_token(),
            params={"repository": repository, "digest": digest},
        )
        if not isinstance(answer, list) or not all(isinstance(a, dict) for a in answer):
            raise MalformedError("the control plane's signature list is malformed")
        return answer

    async def report(self, reports: list[dict[str, Any]]) -> list[int]:
        """Append the gateway's own reports to the log (`POST /v1/reports`); their indexes."""
        answer = await self._call(
            "POST", "/v1/reports", await self._own_token(), json={"reports": reports}
        )
        indexes = answer.get("log_indexes") if isinstance(answer, dict) else None
        if not isinstance(indexes, list):
            raise MalformedError("the control plane's report answer is malformed")
        return [int(index) for index in indexes]

    async def revocations(self, since: int) -> dict[str, Any]:
        """`GET /v1/auth/revocations?since=N`: the revocations after N (revocations.py)."""
        answer = await self._call(
            "GET", "/v1/auth/revocations", await self._own_token(), params={"since": since}
        )
        if not isinstance(answer, dict):
            raise MalformedError("the control plane's revocation list is malformed")
        return answer

    async def command_key(self) -> str:
        """The control plane's command key (PEM) that signs MQTT commands."""
        answer = await self._call("GET", "/v1/commands/key", await self._own_token())
        key = answer.get("public_key") if isinstance(answer, dict) else None
        if not isinstance(key, str):
            raise MalformedError("the control plane's command key answer is malformed")
        return key


def _signing_alg(key: jwk.JWK) -> str:
    if key.get("kty") == "RSA":
        return "RS256"
    if key.get("kty") == "OKP":
        return "EdDSA"
    return {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}.get(str(key.get("crv")), "ES256")


def _error(response: httpx.Response) -> TrustplaneError:
    """The error table's class for an error answer (errors.py): a 400 or 409 is
    the control plane refusing the question, not the control plane being down."""
    try:
        body = response.json()
    except ValueError:
        body = None
    return error_from_http(response.status_code, body, "control plane")
