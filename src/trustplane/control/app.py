"""The FastAPI application: routers, error mapping, metrics.

Every expected failure becomes a JSON error with one message and a status
that says what went wrong (401 who are you, 403 not allowed, 404, 400/422
bad request, 503 a dependency is down); anything unexpected is a 500 that
says nothing about the inside. Payloads never appear in responses other
than the one that releases them, nor in logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import Counter, Histogram
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from trustplane import __version__
from trustplane.control.revocations import REFRESH
from trustplane.control.routers import (
    attestation,
    auth,
    commands,
    images,
    kms,
    layer_chains,
    log,
    ops,
    policy,
    principals,
    reports,
    runtime,
    signatures,
    volumes,
)
from trustplane.control.service import ControlPlane
from trustplane.errors import (
    MalformedError,
    NotFoundError,
    TrustplaneError,
    UsageError,
    error_body,
)

logger = logging.getLogger("trustplane.server")
REQUESTS = Counter("trustplane_http_requests_total", "HTTP requests", ["route", "status"])
LATENCY = Histogram(
    "trustplane_http_request_seconds",
    "HTTP request latency",
    ["route"],
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0, 5.0),
)


async def _expire_silent_nodes(plane: ControlPlane) -> None:
    """Continuous attestation: a node whose pass ages out loses it, logged."""
    period = max(1.0, min(10.0, plane.settings.attestation.max_age_seconds / 4))
    while True:
        await asyncio.sleep(period)
        try:
            await anyio.to_thread.run_sync(plane.verifier.expire_silent)
        except Exception as exc:  # the next sweep retries; the gate checks age anyway
            logger.error("attestation sweep failed: %s", type(exc).__name__)


async def _finish_volume_deletes(plane: ControlPlane) -> None:
    """Deletes a crash interrupted (key shredded, storage not yet) are finished at start."""
    try:
        await anyio.to_thread.run_sync(plane.volumes.recover)
    except Exception as exc:  # the next delete of that volume finishes it
        logger.error("finishing interrupted volume deletes failed: %s", type(exc).__name__)


async def _read_revocations(plane: ControlPlane) -> None:
    """Revocations made on other replicas come into force here within REFRESH seconds."""
    while True:
        await asyncio.sleep(REFRESH)
        try:
            await anyio.to_thread.run_sync(plane.revocations.refresh)
        except Exception as exc:  # the next read retries
            logger.error("reading revocations failed: %s", type(exc).__name__)


_FRAMEWORK_ERRORS: dict[int, type[TrustplaneError]] = {
    400: MalformedError,  # a body that does not parse
    404: NotFoundError,
    405: UsageError,
}


def describe_invalid(errors: Sequence[Any], shown: int = 3) -> str:
    """One line for a request the validators refused: where, and why."""
    parts = []
    for error in errors[:shown]:
        loc = [str(part) for part in error.get("loc", ())]
        if error.get("type") == "json_invalid":
            at = f" at character {loc[1]}" if len(loc) > 1 else ""
            why = error.get("ctx", {}).get("error", "?")
            parts.append(f"body: not valid JSON{at} ({why})")
            continue
        parts.append(f"{'.'.join(loc)}: {error.get('msg', 'invalid')}")
    more = f" (and {len(errors) - shown} more)" if len(errors) > shown else ""
    return "invalid request: " + "; ".join(parts) + more


def create_app(plane: ControlPlane) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        tasks = [
            asyncio.create_task(_expire_silent_nodes(plane)),
            asyncio.create_task(_read_revocations(plane)),
            asyncio.create_task(_finish_volume_deletes(plane)),
        ]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            plane.close()

    app = FastAPI(
        title="trustplane control plane",
        version=__version__,
        description="Identity, policy, KMS and transparency log for trustplane nodes.",
        lifespan=lifespan,
    )
    app.state.plane = plane
    for module in (
        ops,
        auth,
        principals,
        policy,
        kms,
        images,
        signatures,
        log,
        reports,
        runtime,
        attestation,
        commands,
        layer_chains,
        volumes,
    ):
        app.include_router(module.router)

    @app.exception_handler(TrustplaneError)
    async def expected(_: Request, exc: TrustplaneError) -> JSONResponse:
        status = exc.http_status
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse(error_body(exc), status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(
            error_body(MalformedError(describe_invalid(exc.errors()))),
            status_code=MalformedError.http_status,
        )

    @app.exception_handler(StarletteHTTPException)
    async def framework(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # The framework's own answers (an unparsable body, an unknown route or
        # method) get the same error shape as ours.
        kind = _FRAMEWORK_ERRORS.get(exc.status_code)
        name = kind.error_type if kind is not None else "HTTPError"
        return JSONResponse(
            {"error": {"type": name, "message": str(exc.detail)}},
            status_code=exc.status_code,
            headers=exc.headers,
        )

    @app.exception_handler(DataError)
    @app.exception_handler(UnicodeEncodeError)
    async def unstorable(request: Request, exc: Exception) -> JSONResponse:
        # A string or number the request validators accept but the database or
        # UTF-8 cannot hold: JSON may carry unpaired surrogates ("\ud800"),
        # PostgreSQL refuses NUL characters and out-of-range integers.
        logger.info(
            "unstorable value on %s %s: %s", request.method, request.url.path, type(exc).__name__
        )
        refusal = MalformedError(
            "the request holds a value that cannot be stored (a NUL character, an "
            "unpaired surrogate, or a number or text out of range)"
        )
        return JSONResponse(error_body(refusal), status_code=refusal.http_status)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error(
            "internal error on %s %s: %s", request.method, request.url.path, type(exc).__name__
        )
        return JSONResponse(
            error_body(TrustplaneError("internal error")), status_code=TrustplaneError.http_status
        )

    app.add_middleware(_Measure)
    return app


class _Measure:
    """Request count and latency per route, as plain ASGI middleware.

    Starlette's `BaseHTTPMiddleware` (`@app.middleware("http")`) runs each
    request through extra tasks and memory streams; at a thousand requests a
    second that alone cost a tenth of a core.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            name = getattr(scope.get("route"), "path", "unmatched")
            LATENCY.labels(name).observe(time.perf_counter() - start)
            REQUESTS.labels(name, str(status)).inc()
