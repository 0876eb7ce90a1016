"""The gateway's link to the control plane: the one client, its error table, its caches.

The control plane here is its own application on loopback (routers, error
handlers); only who a token belongs to is decided by the test, so that the
control plane answers each status a real one can.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import FastAPI

from trustplane.control.app import create_app
from trustplane.control.identity import Principal
from trustplane.control.routers import deps
from trustplane.embedded.app_server import serve_app
from trustplane.errors import (
    AuthError,
    IntegrityError,
    TrustplaneError,
    UnavailableError,
    UnsupportedError,
    UsageError,
)
from trustplane.gateway.control_link import REFUSED_TTL, Caller, ControlLink, NodeCredential
from trustplane.gateway.decide import Gatekeeper
from trustplane.gateway.docker_api import DockerApi
from trustplane.gateway.request import parse_target

OPERATOR = Principal("user", "olga", "operator", frozenset(), gateways=frozenset({"gw-1"}))


class Plane:
    """The control plane's app, whose callers are whatever `outcome` says; counts questions."""

    def __init__(self) -> None:
        self.outcome: Principal | TrustplaneError = OPERATOR
        self.asked = 0
        self.app: FastAPI = create_app(None)  # type: ignore[arg-type]
        self.app.dependency_overrides[deps.principal] = self._caller

    async def _caller(self) -> Principal:
        self.asked += 1
        if isinstance(self.outcome, TrustplaneError):
            raise self.outcome
        return self.outcome


def _link(url: str, tmp_path: Path) -> ControlLink:
    token_file = tmp_path / "gateway.token"
    token_file.write_text("the gateway's own token\n")
    return ControlLink(url, None, token_file=token_file)


@pytest.mark.parametrize(
    ("refusal", "status"),
    [(UsageError("bad question"), 400), (IntegrityError("conflicting record"), 409)],
)
def test_a_refused_question_is_not_an_unavailable_control_plane_and_still_denies(
    tmp_path: Path, refusal: TrustplaneError, status: int
) -> None:
    plane = Plane()
    plane.outcome = refusal

    async def scenario(url: str) -> None:
        link = _link(url, tmp_path)
        keeper = Gatekeeper(link, DockerApi(str(tmp_path / "no-dockerd.sock")))
        try:
            with pytest.raises(type(refusal)) as caught:
                await link.whoami("caller-token")
            assert not isinstance(caught.value, UnavailableError)
            verdict = await keeper.decide(
                parse_target("POST", "/v1.41/containers/x/start"), ["caller-token"], b"", None
            )
            assert not verdict.allowed
            assert verdict.status == status
            assert str(refusal) in verdict.message
        finally:
            await link.close()
            await keeper.docker.close()

    with serve_app(plane.app) as url:
        asyncio.run(scenario(url))


def test_vouched_callers_are_remembered_and_refused_tokens_briefly_too(tmp_path: Path) -> None:
    plane = Plane()

    async def scenario(url: str) -> None:
        link = _link(url, tmp_path)
        try:
            first = await link.whoami("olga-token")
            assert first == Caller("user:olga", "operator", frozenset({"gw-1"}))
            assert await link.whoami("olga-token") == first
            assert plane.asked == 1  # the second answer came from memory
            plane.outcome = AuthError("the access token is invalid or expired")
            for _ in range(3):
                with pytest.raises(AuthError, match="invalid or expired"):
                    await link.whoami("forged-token")
            assert plane.asked == 2  # a flood of one bad token asks once
            assert REFUSED_TTL > 0
        finally:
            await link.close()

    with serve_app(plane.app) as url:
        asyncio.run(scenario(url))


def test_a_control_plane_that_does_not_answer_denies(tmp_path: Path) -> None:
    async def scenario() -> None:
        link = _link("http://127.0.0.1:9", tmp_path)  # discard port: nothing listens
        try:
            with pytest.raises(UnavailableError, match="control plane"):
                await link.whoami("caller-token")
        finally:
            await link.close()

    asyncio.run(scenario())


def test_an_unsupported_node_key_is_refused_before_any_question(tmp_path: Path) -> None:
    """The same one line as the agent's (crypto/node_assertion.py), not a wrong signature."""
    key_file = tmp_path / "gw.pem"
    key_file.write_bytes(
        ec.generate_private_key(ec.SECP256K1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )

    async def scenario() -> None:
        link = ControlLink("http://127.0.0.1:9", None, node=NodeCredential("gw-1", key_file))
        try:
            with pytest.raises(UnsupportedError) as refused:
                await link.ensure_identity()
        finally:
            await link.close()
        assert str(refused.value) == (
            f"node key {key_file}: an EC key on curve secp256k1 cannot sign node assertions; "
            "use EC P-256, P-384 or P-521, Ed25519, or RSA"
        )

    asyncio.run(scenario())
