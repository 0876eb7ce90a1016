"""The one client: typed answers, and every error class back as itself, over real HTTP.

The server is the control plane's own application (its routers and error
handlers) on loopback; only who the caller is gets decided by the test
(the `principal` dependency), so that each error class can be raised
where a real request meets it.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
from fastapi import FastAPI

from trustplane.client import AsyncControlClient, ControlClient, whoami_call
from trustplane.control.app import create_app
from trustplane.control.identity import Principal
from trustplane.control.routers import deps
from trustplane.embedded.app_server import serve_app
from trustplane.errors import (
    MalformedError,
    TrustplaneError,
    UnavailableError,
    error_table,
)

ALICE = Principal("user", "alice", "operator", frozenset({"kms"}), gateways=frozenset({"gw-1"}))


def _plane_where_callers_are(outcome: Principal | TrustplaneError) -> FastAPI:
    app = create_app(None)  # type: ignore[arg-type]  # whoami needs only the caller

    async def caller() -> Principal:
        if isinstance(outcome, TrustplaneError):
            raise outcome
        return outcome

    app.dependency_overrides[deps.principal] = caller
    return app


def test_answers_come_back_as_the_api_models() -> None:
    with serve_app(_plane_where_callers_are(ALICE)) as url, ControlClient(url, token="t") as client:
        who = client.whoami()
    assert (who.subject, who.role, who.scopes, who.gateways) == (
        "user:alice",
        "operator",
        ["kms"],
        ["gw-1"],
    )


@pytest.mark.parametrize("kind", error_table(), ids=lambda kind: kind.__name__)
def test_every_error_class_comes_back_as_itself_on_both_transports(
    kind: type[TrustplaneError],
) -> None:
    app = _plane_where_callers_are(kind("the reason"))

    async def ask_async(url: str) -> TrustplaneError:
        client = AsyncControlClient(url)
        try:
            await client.call(whoami_call(), "t")
        except TrustplaneError as exc:
            return exc
        finally:
            await client.close()
        raise AssertionError("no error")

    with serve_app(app) as url:
        with ControlClient(url, token="t") as client, pytest.raises(TrustplaneError) as caught:
            client.whoami()
        from_async = asyncio.run(ask_async(url))
    for error in (caught.value, from_async):
        assert type(error) is kind
        assert str(error) == "control plane: the reason"


def test_an_answer_that_does_not_fit_its_model_is_malformed() -> None:
    liar = FastAPI()

    @liar.get("/v1/auth/whoami")
    def whoami() -> dict[str, object]:
        return {"subject": ["not", "a", "name"], "role": "admin"}

    with (
        serve_app(liar) as url,
        ControlClient(url, token="t") as client,
        pytest.raises(MalformedError, match="GET /v1/auth/whoami is malformed"),
    ):
        client.whoami()


def test_a_control_plane_that_does_not_answer_is_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        with (
            ControlClient(f"http://127.0.0.1:{port}") as client,
            pytest.raises(UnavailableError, match="unreachable"),
        ):
            client.whoami()
