"""The gateway's questions to the control plane: who is this, may they, is it registered.

Built on the one client (client.py's `AsyncControlClient` and its `Call`s):
asynchronous, so that one slow answer never holds up the other connections.
What this adds is the gateway's own: its identity, and a short memory of
whom the control plane vouched for. Every failure (timeout, refusal,
garbage) raises a TrustplaneError of the error table, which the gateway
turns into a denial: fail closed.

The gateway has its own identity: a registered node signs a short-lived
assertion (RFC 7523) with its key and gets a token, renewed before it
expires; or an operator hands it a token file. It asks `POST /v1/authorize`
for the caller (`subject`), which only nodes and admins may do.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from trustplane.api.fields import Scalar
from trustplane.api.identity import Revocations
from trustplane.api.images import ImageEntry
from trustplane.api.reports import Report
from trustplane.api.signatures import SignatureEntry
from trustplane.client import (
    AsyncControlClient,
    authorize_call,
    command_key_call,
    images_call,
    node_login_call,
    report_call,
    revocations_call,
    signatures_call,
    token_audience,
    whoami_call,
)
from trustplane.crypto.node_assertion import load_node_key, make_node_assertion
from trustplane.errors import AuthError, MalformedError
from trustplane.gateway import defaults

WHOAMI_TTL = 30.0
WHOAMI_CACHE = 4096
REFUSED_TTL = 5.0


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
        timeout: float = defaults.CONTROL_TIMEOUT,
    ) -> None:
        if node is None and token_file is None:
            raise AuthError(
                "the gateway needs its own identity: --node and --node-key, or --token-file"
            )
        self.api = AsyncControlClient(url, ca_file, timeout)
        self.url = self.api.url
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
        await self.api.close()

    # -- the gateway's own identity ------------------------------------------------------

    async def ensure_identity(self) -> None:
        """Get the gateway's own token now: a gateway that cannot ask must not start."""
        await self._own_token()

    async def own_name(self) -> str:
        """This gateway's name: its node's, or (a token file) whoever its token names."""
        if self.name is None:
            answer = await self.api.call(whoami_call(), await self._own_token())
            if ":" not in answer.subject:
                raise MalformedError("the control plane's whoami answer is malformed")
            self.name = answer.subject.partition(":")[2]
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
            pem = node.key_file.read_bytes()
        except OSError as exc:
            raise AuthError(f"node key {node.key_file}: {exc.strerror}") from None
        key = load_node_key(pem, f"node key {node.key_file}")
        assertion = make_node_assertion(key, node.name, token_audience(self.url))
        answer = await self.api.call(node_login_call(node.name, assertion), None)
        self._token = answer.access_token
        # Renew well before expiry, so no request meets an expired token.
        self._token_expires = time.time() + max(5, answer.expires_in * 0.8)

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
            answer = await self.api.call(whoami_call(), token)
        except AuthError as exc:
            # Remember a refused token briefly: a flood of bad tokens must not
            # become a flood of questions to the control plane.
            self._refused[key] = (now + REFUSED_TTL, str(exc))
            while len(self._refused) > WHOAMI_CACHE:
                self._refused.popitem(last=False)
            raise
        caller = Caller(
            answer.subject,
            answer.role,
            frozenset(answer.gateways) if answer.gateways is not None else None,
            answer.token_id,
            answer.issued_at,
        )
        self._whoami[key] = (now + WHOAMI_TTL, caller)
        while len(self._whoami) > WHOAMI_CACHE:
            self._whoami.popitem(last=False)
        return caller

    async def authorize(
        self,
        caller: Caller,
        action: str,
        resource: str,
        context: dict[str, Scalar] | None = None,
    ) -> tuple[bool, str]:
        """(allowed, reason); only an explicit `allow` is True.

        `context` (the container's metadata) is logged with the decision.
        """
        call = authorize_call(action, resource, caller.kind_and_name, context=context)
        answer = await self.api.call(call, await self._own_token())
        return answer.allowed, answer.reason

    async def images(self, repository: str) -> list[ImageEntry]:
        """What the control plane registered for `repository` (possibly nothing)."""
        return await self.api.call(images_call(repository), await self._own_token())

    async def signatures(self, repository: str, digest: str) -> list[SignatureEntry]:
        """The signatures the control plane logged for `repository@digest` (possibly none)."""
        return await self.api.call(signatures_call(repository, digest), await self._own_token())

    async def report(self, reports: list[Report]) -> list[int]:
        """Append the gateway's own reports to the log (`POST /v1/reports`); their indexes."""
        answer = await self.api.call(report_call(reports), await self._own_token())
        return answer.log_indexes

    async def revocations(self, since: int) -> Revocations:
        """`GET /v1/auth/revocations?since=N`: the revocations after N (revocations.py)."""
        return await self.api.call(revocations_call(since), await self._own_token())

    async def command_key(self) -> str:
        """The control plane's command key (PEM) that signs MQTT commands."""
        answer = await self.api.call(command_key_call(), await self._own_token())
        return answer.public_key
